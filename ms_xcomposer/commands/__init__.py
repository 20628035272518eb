"""One module per `ms-xcomposer` subcommand; each exposes `register(subparsers)`."""
