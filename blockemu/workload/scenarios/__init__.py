"""Built-in job files (fio syntax), listed by `blockemu run --list`."""
