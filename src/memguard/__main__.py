"""`python -m memguard` (and `accelerate launch -m memguard`) runs the CLI."""

from memguard.cli import main

main()
