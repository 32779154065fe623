// Layer Balance shows only the inputs its source uses; hidden widgets keep their values and are saved as before.
import { app } from "../../scripts/app.js";
import { LAYER_BALANCE, unusedInputs } from "./layer_balance_inputs.js";

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function showUsedInputs(node) {
  const unused = new Set(unusedInputs(widget(node, "source")?.value, widget(node, "preset")?.value));
  for (const name of ["grading", "lambda_s", "preset", "only_self_level", "blocks"]) {
    const found = widget(node, name);
    if (found) found.hidden = unused.has(name);
  }
  node.setSize?.([node.size[0], node.computeSize()[1]]);
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "MultiCond.LayerBalance",
  nodeCreated(node) {
    if (node.comfyClass !== LAYER_BALANCE) return;
    for (const name of ["source", "preset"]) {
      const found = widget(node, name);
      if (!found) continue;
      const previous = found.callback;
      found.callback = function (...args) {
        const result = previous?.apply(this, args);
        showUsedInputs(node);
        return result;
      };
    }
    showUsedInputs(node);
  },
  loadedGraphNode(node) {
    // A loaded workflow sets the widget values after nodeCreated.
    if (node.comfyClass === LAYER_BALANCE) showUsedInputs(node);
  },
});
