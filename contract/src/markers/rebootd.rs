//! Markers of rebootd (constructors are added with the code that prints them).
