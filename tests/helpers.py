"""What several test files share besides fixtures (those are in conftest.py)."""

import os
import platform
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# where pack_linears packs the weights for several samples: x86 CPUs with oneDNN
CAN_PACK = platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()

# A few lines in the dataset's style, repeated with a counter so the text is not perfectly periodic.
VERSE = """First Citizen:
Before we proceed any further, hear me speak.

All:
Speak, speak.

First Citizen:
You are all resolved rather to die than to famish?

All:
Resolved. resolved.

ROMEO:
But, soft! what light through yonder window breaks?
It is the east, and Juliet is the sun.

"""
TINY_TEXT = "".join(VERSE.replace("First", ["First", "Second", "Third"][i % 3]) for i in range(60))


def run_script(*args, cwd=REPO):
    """Run one of the project's scripts as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(REPO, args[0]), *args[1:]],
                          capture_output=True, text=True, cwd=cwd, timeout=300)
