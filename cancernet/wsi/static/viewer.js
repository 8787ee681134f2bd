// cancernet view: a slide page (CONFIG is set by the page; noteError by ERRORS_JS)
var viewer=OpenSeadragon({id:'view',tileSources:CONFIG.dzi,showNavigationControl:false,
  imageSmoothingEnabled:false,maxZoomPixelRatio:4});
var layer=null;
function slide(){return viewer.world.getItemAt(0)}  // the slide's own image: its pixels are level 0's
viewer.addHandler('tile-load-failed',function(e){noteError('tile failed: '+e.message)});
viewer.addHandler('open',function(){
  if(CONFIG.overlay){viewer.addTiledImage({tileSource:{type:'image',url:CONFIG.overlay},x:0,y:0,
    width:CONFIG.overlayWidth,opacity:parseFloat(document.getElementById('opacity').value),
    success:function(e){layer=e.item;go()}})}else{go()}
  if(CONFIG.regions){viewer.addTiledImage({tileSource:{type:'image',url:CONFIG.regions},x:0,y:0,width:CONFIG.overlayWidth})}
  if(CONFIG.truth){viewer.addTiledImage({tileSource:{type:'image',url:CONFIG.truth},x:0,y:0,width:CONFIG.overlayWidth})}
});
document.getElementById('opacity').addEventListener('input',function(e){if(layer){layer.setOpacity(parseFloat(e.target.value))}});
function centre(){var c=slide().viewportToImageCoordinates(viewer.viewport.getCenter(true));
  document.body.dataset.center=Math.round(c.x)+','+Math.round(c.y);
  document.body.dataset.zoom=slide().viewportToImageZoom(viewer.viewport.getZoom(true)).toFixed(4)}
viewer.addHandler('animation-finish',centre);
function go(){
  var h=location.hash.slice(1),m;
  if((m=h.match(/^tile-(\d+)$/))){var a=document.querySelectorAll('a.tile')[+m[1]];if(a){zoomTo(+a.dataset.x,+a.dataset.y,+a.dataset.size)}}
  else if((m=h.match(/^view=([\d.]+),([\d.]+),([\d.]+)(?:,([\d.]+))?$/))){
    if(m[4]!==undefined&&layer){layer.setOpacity(+m[4])}
    viewer.viewport.fitBounds(slide().imageToViewportRectangle(+m[1]-m[3]/2,+m[2]-m[3]/2,+m[3],+m[3]),true)}
  centre();document.body.dataset.ready='1'}
function zoomTo(x,y,size){viewer.viewport.fitBounds(slide().imageToViewportRectangle(x-size,y-size,3*size,3*size),true);centre()}
window.addEventListener('hashchange',go);
document.querySelectorAll('a.tile').forEach(function(a){a.addEventListener('click',function(){setTimeout(go,0)})});
