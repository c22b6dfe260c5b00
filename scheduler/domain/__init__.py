"""The vocabulary of the scheduler: plain enums and value types, no I/O.

Everything here is imported by the pure placement policy, the database models, the API
schemas and the agent alike, so it must never import an outside system.
"""
