"""Capacity planning: memory, communication and step time of a layout, from the config alone."""
