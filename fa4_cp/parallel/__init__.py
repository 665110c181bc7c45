"""Ring machinery: layout, sharding, schedule, transport and executor."""
