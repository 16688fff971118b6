"""Workloads and scenarios: fio job files and their runner, the stress mix, the
key-removal race, crash campaigns. Scripted async jobs against a mounted image.

May import ``fs``, ``check``, ``device`` and the common modules; only the CLI
imports it.
"""
