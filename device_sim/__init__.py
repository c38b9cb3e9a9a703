"""A simulator of many bike locks, each running the firmware's own LockController."""
