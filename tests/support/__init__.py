"""Helpers shared by the test tiers (builders, clocks, fakes of our own ports)."""
