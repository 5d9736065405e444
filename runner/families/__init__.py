"""The model families the runner draws, one module each; `recognise` picks a model's family from its
model_index.json. To add one: a module here exposing `FAMILY`, its line in FAMILIES, a conf/model/*.yaml, and its
line in the parity tests."""

from runner.families import flux, sd3, sdxl, stable_diffusion, unconditional
from runner.families.base import Components, Family

FAMILIES: tuple[Family, ...] = (unconditional.FAMILY, stable_diffusion.FAMILY, sdxl.FAMILY, sd3.FAMILY,
                                  flux.FAMILY)


def component_classes(index: dict) -> dict[str, str]:
    """{component: class name} of a model_index.json, for the components it really has (null entries left out)."""
    return {k: v[1] for k, v in index.items() if isinstance(v, list) and len(v) == 2 and v[1]}


def recognise(index: dict) -> Family | None:
    classes = component_classes(index)
    return next((family for family in FAMILIES if family.recognise(classes)), None)


def by_name(name: str) -> Family:
    return next(family for family in FAMILIES if family.name == name)


def supported() -> str:
    """For error messages: every family and what it loads."""
    return "; ".join(f"{family.name} ({family.summary})" for family in FAMILIES)


__all__ = ["FAMILIES", "Components", "Family", "by_name", "component_classes", "recognise", "supported"]
