// The notebook face of the explorer (featinv.notebook.Explorer): anywidget's render function.
// The kernel does the work; this draws its pictures and sends the controls' state back.
function render({ model, el }) {
  el.classList.add("featinv-explorer");
  el.innerHTML = `
    <div class="fx-row">
      <figure><img class="fx-a"><figcaption>image A</figcaption></figure>
      <figure><div class="fx-paint"><img class="fx-map"><canvas class="fx-cells" width="160" height="160"></canvas></div>
        <figcaption>A's map (paint cells) · <label><input type="checkbox" class="fx-norm"> norm</label></figcaption></figure>
      <figure><img class="fx-b"><figcaption>image B</figcaption></figure>
      <div class="fx-controls">
        <label>class <select class="fx-concept"></select></label>
        <label>strength <input class="fx-strength" type="range" min="-0.5" max="1.5" step="0.1"></label>
        <label>A → B <input class="fx-mix" type="range" min="0" max="1" step="0.1"></label>
        <label>painted cells <select class="fx-operation"></select></label>
        <button class="fx-clear">clear cells</button>
        <label><input type="checkbox" class="fx-previews"> live previews</label>
        <p class="fx-note"></p>
      </div>
    </div>
    <div class="fx-row fx-results"></div>
    <div class="fx-row"><figure><img class="fx-difference"><figcaption>painted edit vs unedited</figcaption></figure></div>
    <p class="fx-status"></p>`;
  const $ = (name) => el.querySelector(".fx-" + name);
  const names = { steer: "steer only there", zero: "ablate: zero", mean: "ablate: the examples' mean", paste: "paste B's map" };
  for (const op of model.get("operations")) { const o = document.createElement("option"); o.value = op; o.textContent = names[op] || op; $("operation").appendChild(o); }
  model.get("class_names").forEach((name, k) => { const o = document.createElement("option"); o.value = k; o.textContent = name; $("concept").appendChild(o); });
  if (model.get("steer_note")) { $("concept").disabled = true; $("strength").disabled = true; $("note").textContent = model.get("steer_note"); }

  const cells = () => new Set(model.get("cells").map((cell) => cell.join(",")));
  function draw() {
    const canvas = $("cells"), context = canvas.getContext("2d"), [rows, columns] = model.get("grid");
    const w = canvas.width / columns, h = canvas.height / rows;
    context.clearRect(0, 0, canvas.width, canvas.height);
    context.fillStyle = "rgba(47,111,223,0.45)";
    for (const key of cells()) { const [r, c] = key.split(",").map(Number); context.fillRect(c * w, r * h, w, h); }
  }
  function pictures() {
    $("a").src = model.get("image_a"); $("b").src = model.get("image_b");
    $("map").src = $("norm").checked ? model.get("norm_picture") : model.get("map_picture");
    $("difference").src = model.get("difference"); $("difference").parentElement.hidden = !model.get("difference");
    const results = $("results"); results.innerHTML = "";
    model.get("images").forEach((src, i) => {
      const f = document.createElement("figure"); f.innerHTML = `<img src="${src}"><figcaption>seed ${i}</figcaption>`; results.appendChild(f);
    });
    $("status").textContent = model.get("status");
  }
  function controls() {
    $("strength").value = model.get("strength"); $("mix").value = model.get("mix"); $("concept").value = model.get("concept");
    $("operation").value = model.get("operation"); $("previews").checked = model.get("previews"); draw();
  }
  let painting = null, painted = null;
  const cellAt = (event) => {
    const box = $("cells").getBoundingClientRect(), [rows, columns] = model.get("grid");
    const r = Math.floor((event.clientY - box.top) / box.height * rows), c = Math.floor((event.clientX - box.left) / box.width * columns);
    return r >= 0 && r < rows && c >= 0 && c < columns ? r + "," + c : null;
  };
  $("cells").addEventListener("pointerdown", (e) => { const key = cellAt(e); if (!key) return; painted = cells(); painting = painted.has(key) ? "remove" : "add"; painted[painting === "add" ? "add" : "delete"](key); });
  $("cells").addEventListener("pointermove", (e) => { if (!painting) return; const key = cellAt(e); if (key) painted[painting === "add" ? "add" : "delete"](key); });
  window.addEventListener("pointerup", () => {
    if (!painting) return; painting = null;
    model.set("cells", [...painted].map((key) => key.split(",").map(Number))); model.save_changes();
  });
  const send = (name, value) => { model.set(name, value); model.save_changes(); };
  $("strength").addEventListener("input", () => send("strength", parseFloat($("strength").value)));
  $("mix").addEventListener("input", () => send("mix", parseFloat($("mix").value)));
  $("concept").addEventListener("change", () => send("concept", parseInt($("concept").value)));
  $("operation").addEventListener("change", () => send("operation", $("operation").value));
  $("previews").addEventListener("change", () => send("previews", $("previews").checked));
  $("clear").addEventListener("click", () => send("cells", []));
  $("norm").addEventListener("change", pictures);
  for (const name of ["image_a", "image_b", "map_picture", "norm_picture", "images", "difference", "status"]) model.on("change:" + name, pictures);
  for (const name of ["strength", "mix", "concept", "operation", "previews", "cells"]) model.on("change:" + name, controls);
  controls(); pictures();
}
export default { render };
