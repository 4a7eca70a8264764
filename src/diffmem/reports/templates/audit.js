// Sort the prompts table by a column: numbers by value, text alphabetically; a second click reverses.
document.querySelectorAll("#prompts th.sortable").forEach(function (th, col) {
  th.addEventListener("click", function () {
    var body = document.querySelector("#prompts tbody");
    var rows = Array.from(body.rows);
    var asc = th.dataset.order !== "asc";
    th.dataset.order = asc ? "asc" : "desc";
    rows.sort(function (a, b) {
      var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : String(x).localeCompare(String(y));
      return asc ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
