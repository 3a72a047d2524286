"""The notification service: confirmations, cancellation notices and reminders, each sent
once, over push (the NOTIFICATIONS stream) and email."""
