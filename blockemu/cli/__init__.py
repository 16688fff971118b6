"""The ``blockemu`` command: argument parsing, one-line errors with documented exit
codes, and tables/progress for humans. May import every other layer; nothing
imports it.
"""
