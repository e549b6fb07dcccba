"""careservice: privacy-first customer-care mail service."""
