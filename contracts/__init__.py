"""Wire contracts of the clinic appointments system.

Every shape that crosses a process boundary (events, commands, replies, errors, subjects)
is defined here once, as msgspec Structs, and imported by every service.
"""
