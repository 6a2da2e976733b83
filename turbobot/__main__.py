"""``python -m turbobot`` runs the command line."""

from turbobot.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
