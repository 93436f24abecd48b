//! Markers of init (constructors are added with the code that prints them).
