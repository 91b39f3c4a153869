"""`python -m herovm`: the same command line as `herovm`."""

from .cli import main

if __name__ == "__main__":
    main()
