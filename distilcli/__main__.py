"""``python -m distilcli``: the same as the ``distil`` console script."""

from distilcli.app import main

main()
