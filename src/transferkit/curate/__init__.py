"""Choosing and checking data: active-learning strategies and the out-of-fold label-issue finder."""
