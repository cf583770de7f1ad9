"""graceful's pytest plugin (registered as ``pytest11: graceful``).

Importing it does nothing; library code never imports it. Its fixtures arrive with the
testing issue.
"""
