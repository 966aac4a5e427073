"""One module per image operation; each flow reads as the list of steps it performs."""
