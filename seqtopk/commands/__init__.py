"""Subcommands of the `seqtopk` command line."""
