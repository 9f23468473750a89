"""Time-limited offers: unique codes granted by journeys, expired on time, redeemed once."""
