"""Clients of a Spina agent."""
