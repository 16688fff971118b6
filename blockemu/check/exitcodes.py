"""fsck's exit codes, e2fsck's (DESIGN §6): a module of their own, so that the command can name
them for every subcommand's errors without importing the checker."""

EXIT_CLEAN, EXIT_CORRECTED, EXIT_UNCORRECTED, EXIT_OPERATIONAL, EXIT_USAGE = 0, 1, 4, 8, 16
