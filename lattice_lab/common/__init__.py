"""Small shared helpers: errors, atomic I/O, devices, seeding, progress bars, CLI error reporting."""
