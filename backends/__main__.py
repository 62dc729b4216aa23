"""python -m backends: print the detected backend, chip, tier and the defaults that follow from them."""
from backends import print_hardware_summary

print_hardware_summary()
