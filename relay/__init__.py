"""smtp-relay's supporting modules (smtp_relay.py is the program)."""
