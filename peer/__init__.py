"""The volunteer daemon (installed as ``dedloc.peer``): join, sync state, train, leave cleanly."""
