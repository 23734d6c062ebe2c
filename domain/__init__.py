"""The business: entities, commands, services, errors, events and ports. No I/O frameworks here."""
