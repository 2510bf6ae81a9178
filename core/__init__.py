"""headlab.core: the foundation every part of headlab may import, and which imports none of them: errors,
atomic files and journals, settings and their value kinds, escaping for pages, distributed helpers,
model shapes, head scores and their files, text windows, lazy package exports."""
