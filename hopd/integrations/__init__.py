"""hopd's ideas inside other training libraries (TRL): import the submodule you need."""
