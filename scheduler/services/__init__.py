"""Services: the only code that changes rows. Routes, the CLI and the loop call them with
keyword arguments and a session; each function leaves the session ready to commit."""
