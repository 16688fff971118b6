"""Workloads and scenarios: scripted async jobs against a mounted image."""
