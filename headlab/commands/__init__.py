"""The ``headlab`` commands, one module each, registered in :mod:`.base` (what a command is, and the
registry the command line is built from); :mod:`.common` holds what they share."""
