"""The one exception type for user mistakes (bad flags, files, configs)."""


class UsageError(Exception):
  """A mistake the user can fix. Entry points print `error: <message>` on one line and exit 2."""
