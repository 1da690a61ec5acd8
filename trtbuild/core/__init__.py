"""The small core every package may import: it imports nothing else of trtbuild but its errors."""
