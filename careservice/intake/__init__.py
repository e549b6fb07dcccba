"""Intake adapters: SMTP, IMAP and the web form turn their input into NewMessage records."""
