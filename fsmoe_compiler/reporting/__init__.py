"""Tables and traces for people: tabulate region tables, Chrome/Perfetto schedule traces (no torch)."""
