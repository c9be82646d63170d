"""A module that starts a process when imported, as some libraries probe the system (test_tiers.py)."""

import subprocess

subprocess.run(["true"], check=True)
