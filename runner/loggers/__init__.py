"""Listeners on the record step: each owns one logging library, and a job runs the same with them off."""
