"""One module per `pixart-ds` verb; `pixart_ds/cli.py` only parses arguments and dispatches here."""
