"""Host-side code that deals with guests: SSH keys and connections, config drives, events."""
