// MathJax 3 configuration for pymdownx.arithmatex (generic mode), which wraps math in
// \( ... \) / \[ ... \] inside elements of class "arithmatex". Only those elements are typeset.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
  },
};

// mkdocs-material swaps page content without a reload (instant navigation) and announces each new page
// on its document$ observable: typeset the new page's math then. MathJax typesets the first page itself
// once it has loaded, so nothing is done before it is ready.
document$.subscribe(() => {
  if (!window.MathJax || !MathJax.typesetPromise) {
    return;
  }
  MathJax.startup.output.clearCache();
  MathJax.typesetClear();
  MathJax.texReset();
  MathJax.typesetPromise();
});
