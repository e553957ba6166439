"""What every layer needs and none owns: the command-line layer, device and dtype choice, timing, energy
counters and hardware facts. Imports nothing from the project."""
