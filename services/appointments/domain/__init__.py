"""The appointment aggregate: pure state, rules and decisions. No I/O, no clock, no ids."""
