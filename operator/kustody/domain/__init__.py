"""Pure domain logic: envelope format, version state machine, schedules. No I/O."""
