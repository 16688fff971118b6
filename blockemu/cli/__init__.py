"""The ``blockemu`` command: argument parsing, one-line errors with documented exit
codes, and what people read (tables and bars come from ``blockemu.display``). May import every other layer; nothing
imports it.
"""
