"""KPIs: roll-ups kept current by the writers, and the report read from them."""
